"""Training: mesh and sharding rules, optimizer, train steps, loop, checkpoints."""
