"""The shop app: the Product model, its cached views and its invalidation rule."""
