"""Linux appliers: they take what the renderers produce and talk to the kernel."""
