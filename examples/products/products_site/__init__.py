"""The products example project: a product list and detail pages cached with tags."""
