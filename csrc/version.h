// The single source of handgrad's version (setup.py and CMakeLists.txt read it).
#pragma once
#define HANDGRAD_VERSION "0.1.0"
