"""The node daemon: the tier chain served to local clients over gRPC on a Unix socket."""
