"""Emulators and fixtures for testing code built on modelmora without real runtimes."""
