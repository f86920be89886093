"""v2x package."""
