"""The certificate authority: signing SVIDs, the certificates directory, who may ask."""
