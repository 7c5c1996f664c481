"""The installed distribution's metadata agrees with the package."""

import importlib.metadata

from django.test import SimpleTestCase

import streaming


class MetadataTests(SimpleTestCase):
    def test_version_matches_the_distribution(self):
        self.assertEqual(streaming.__version__, importlib.metadata.version("django-streaming-coordinator"))
