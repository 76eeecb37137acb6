"""Cross-language test vectors of the wire contract (the JSON files are the contract)."""
