"""The gRPC router: validates and tokenizes requests, streams them through the ClusterAPI."""

from batonserve.cluster.router.app import ClusterFactory, ManagedCluster, serve
from batonserve.cluster.router.server import RouterServer

__all__ = ["ClusterFactory", "ManagedCluster", "RouterServer", "serve"]
