"""Engines built on BlueEngine that ship with it; `services.face` is the face-recognition one."""
