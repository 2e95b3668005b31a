package dev.tbsm.sample

import android.app.Activity
import android.os.Bundle
import android.widget.TextView
import dev.tbsm.sdk.Event
import dev.tbsm.sdk.TbsmRecommender
import dev.tbsm.sdk.open
import kotlin.concurrent.thread

/** Opens the bundle from assets/tbsm, records a view, ranks ten items and shows the scores. */
class MainActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val view = TextView(this)
        setContentView(view)
        thread {
            val text = try {
                TbsmRecommender.open(this, copyFromAssets = "tbsm") { problem -> println("history: $problem") }.use { rec ->
                    val items = rec.manifest.items.ids
                    val now = System.currentTimeMillis() / 1000
                    rec.record(Event(itemId = items[0], categoryId = rec.manifest.categories.ids[0], behavior = "pv", timestamp = now))
                    val ranked = rec.rank(items.take(10))
                    "history: ${rec.history().size} events\n" + ranked.joinToString("\n") { "${it.itemId}  ${"%.4f".format(it.score)}" }
                }
            } catch (e: Exception) {
                "error: ${e.message}"
            }
            runOnUiThread { view.text = text }
        }
    }
}
