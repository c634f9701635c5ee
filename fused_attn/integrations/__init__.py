"""Integrations with other libraries; each is optional and activates only when its library is installed."""
