"""mppools."""
