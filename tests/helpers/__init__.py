"""Shared test helpers: tiny models, fake generators, the simcord harness, scripted engines.

Test modules import from here, never from each other or from conftest.py (which only declares fixtures).
"""
