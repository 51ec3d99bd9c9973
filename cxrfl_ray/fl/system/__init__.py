"""The simulated system (docs/SYSTEM.md): client profiles (``profiles.py``) and the round policy
with its virtual clock (``policy.py``)."""
