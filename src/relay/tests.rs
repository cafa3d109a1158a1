//! Pair tests (placeholder).
