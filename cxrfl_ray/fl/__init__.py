"""Federated learning on Flower: the ClientApp, the ServerApp and the engine that runs them.

Only ``engine.py`` calls Flower's simulation engine (and so Ray); the tasks know nothing of
Flower, and Flower knows nothing of Tune.
"""
