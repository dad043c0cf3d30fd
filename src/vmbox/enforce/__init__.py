"""`enforce: kernel`: per-source limits enforced by nftables in a node's namespace.

nftables.py (pure) builds the JSON documents (install, set_rates, delete) and
reads nft's JSON listings; kernel.py (the driver) runs them with `nft -j`
inside the namespace. docs/nftables-rates.md is the finding behind the
construct.
"""
