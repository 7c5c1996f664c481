"""The test runner: Django's, plus a clean Redis namespace when the broker is Redis."""

from django.test.runner import DiscoverRunner

from streaming.conf import get_settings


class StreamingTestRunner(DiscoverRunner):
    def setup_databases(self, **kwargs):
        config = super().setup_databases(**kwargs)
        url = get_settings().BROKER_URL
        if url and url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            from streaming.transports.redis import STREAM_PREFIX

            # The test database starts empty, so task ids start over: streams
            # of an earlier run would otherwise hold events under the same keys.
            with redis.Redis.from_url(url) as client:
                keys = list(client.scan_iter(match=STREAM_PREFIX + "*", count=1000))
                if keys:
                    client.delete(*keys)
        return config
