"""The device side of a step: inputs, the jitted step (forward, then sampler), and sampling."""
