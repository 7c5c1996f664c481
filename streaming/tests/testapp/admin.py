from django.contrib import admin

from streaming.admin import StreamTaskAdmin

from .models import EphemeralTask, FragileTask, GeneratorTask, PrivateTask, ScriptedTask

for model in (ScriptedTask, FragileTask, EphemeralTask, GeneratorTask, PrivateTask):
    admin.site.register(model, StreamTaskAdmin)
