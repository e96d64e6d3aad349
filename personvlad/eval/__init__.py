"""personvlad.eval"""
