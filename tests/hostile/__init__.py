"""Regression tests for the security review (issue 13): hostile clients, peers and upstream
answers. Each test names the behaviour it pins; shared fakes live in `helpers.py`."""
