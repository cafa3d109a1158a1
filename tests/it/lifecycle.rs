//! Lifecycle tests (filled by the lifecycle issue).
