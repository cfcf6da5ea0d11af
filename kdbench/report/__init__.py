"""Leaderboards and report folders: statistics, fingerprints, tables, figures, renderers."""
