"""Training: the joint AR + diffusion objective, data, the trainer and its CLI (`trimode train`)."""
