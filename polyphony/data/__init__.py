"""Data pipeline: ``prepare`` turns a MIDI folder into token shards, ``dataset`` reads them.

Import the submodules directly (``from polyphony.data.prepare import prepare_dataset``); this
package imports nothing so that ``python -m polyphony.data.prepare`` runs without warnings.
"""
