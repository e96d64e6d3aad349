"""personvlad.engine"""
