//! Pushing an image written as an OCI layout to a registry.
