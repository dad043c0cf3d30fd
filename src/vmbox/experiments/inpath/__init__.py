"""The in-path versions of the experiments (`vmbox experiment NAME --dataplane nfqueue`).

Each module runs its experiment with the service in the packet path: a lab of
network namespaces built for the run and always removed (setup.py), replicas
on netfilter queues in its gateway, real clients (hping3, ping) in its client
namespace, and what the server received counted by tcpdump in the server's
namespace (vmbox.labclients). Listed in INPATH_EXPERIMENTS (vmbox.experiments)
under the same names as the relay experiments they mirror.
"""
