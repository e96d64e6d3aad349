"""personvlad.models"""
