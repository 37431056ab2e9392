"""lb: Katran-compatible L4 load balancer library: config model, hashing, Maglev, the userspace datapath and the bcc loader."""
