"""The device side of a step: inputs, the one jitted step, and sampling."""
