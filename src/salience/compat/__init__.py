"""Compatibility APIs of other libraries, built on salience's methods: ``keras_vis``."""
