"""Package data: the quick-start notebook, kernel logos."""
