"""The project's own models: the reference SD3-architecture model trained on procedural shapes."""
