"""What is pure: residency, the cache controller, policies, the scorer, EAM and EAMC (numpy and Numba, no torch)."""
