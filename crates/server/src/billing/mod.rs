//! Billing: signed webhooks move subscriptions; plans set each device's
//! request budget.
//!
//! * [`signature`] — the two webhook signature schemes (pure).
//! * [`event`] — the webhook event schema and its validation (pure).
//! * [`plans`] — each user's plan, cached per instance and dropped on every
//!   instance the moment a webhook changes it.
//! * [`limits`] — the per-device token bucket on every device-authenticated
//!   request (the `RateLimit-*` headers that report it are `http::rate_limit`).

pub mod event;
pub mod limits;
pub mod plans;
pub mod signature;
