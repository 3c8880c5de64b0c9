"""The accuracy suite: scenarios x methods x seeds on SmolLM2-135M and WordNet (see suite.py)."""
