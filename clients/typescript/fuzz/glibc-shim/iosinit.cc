// GCC 13's libstdc++ entry point (GLIBCXX_3.4.32) that the prebuilt addon calls to
// set up iostreams; this libstdc++ (GCC 12) sets them up with ios_base::Init.
#include <ios>
namespace std { void ios_base_library_init() { static ios_base::Init init; } }
