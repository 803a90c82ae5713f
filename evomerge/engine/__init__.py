"""Population, fitness workers and the search loop."""
