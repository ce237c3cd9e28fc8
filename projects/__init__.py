"""Methods built on the shared openseg core; installed as `openseg.projects.<name>`."""
