/* glibc 2.38 names of strtol/strtoul (C23 binary literals); this glibc is 2.36. */
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **end, int base) { return strtol(s, end, base); }
unsigned long __isoc23_strtoul(const char *s, char **end, int base) { return strtoul(s, end, base); }
