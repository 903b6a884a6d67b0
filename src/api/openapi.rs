//! The OpenAPI 3.1 document of the admin API, served at `/api/v1/openapi.json`. It is written
//! by hand beside the routes; a test validates it and checks that it names exactly the routes
//! the API serves.

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");
