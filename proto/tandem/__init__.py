"""Tandem wire API (proto package ``tandem``)."""
