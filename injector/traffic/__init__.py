"""Traffic redirection: the iptables rules of the init container."""
