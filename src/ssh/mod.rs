//! SSH side of mse-vpn (skeleton).
