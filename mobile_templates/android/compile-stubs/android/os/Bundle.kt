// Compile-only stub of android.os.Bundle. Not for apps.
package android.os

class Bundle
