import comfyui_flashvsr.attention as a

def test_import():
    assert a.BLOCK == 128
