"""fedmole."""
