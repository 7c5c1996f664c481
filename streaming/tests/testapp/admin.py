from django.contrib import admin

from streaming.admin import StreamTaskAdmin

from .models import EphemeralTask, FragileTask, GeneratorTask, ScriptedTask

for model in (ScriptedTask, FragileTask, EphemeralTask, GeneratorTask):
    admin.site.register(model, StreamTaskAdmin)
