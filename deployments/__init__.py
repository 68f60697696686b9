"""Ray Serve shells around the core library (ingress + resident engine deployments). Filled in by the Serve issue."""
