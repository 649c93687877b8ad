"""What touches memory: where a layer's experts are found, the device slot pool, the host tier, transfers."""
